"""Process groups: the launch environment (pure, launch.py) and DistContext, where every collective lives
(context.py).
"""
