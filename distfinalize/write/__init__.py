"""The rank's data path: feeds that read or exchange source bytes, the overlapped transform/write stages, and the
safetensors writer.
"""
