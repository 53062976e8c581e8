"""DeepSpeed ZeRO 1/2/3 tag folders: layout math, file discovery, safe metadata unpickling, the Source and its
reader.
"""
