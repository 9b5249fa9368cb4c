"""Task-vector analysis (`mergekit-rlvr analyze`): pure statistics in ``stats``,
streaming reader and driver in ``stream``, report files in ``report``."""
