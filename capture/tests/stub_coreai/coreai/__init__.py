"""STUB of Apple's `coreai` package, for qgate's capture tests only. Not the real runtime.

Put on sys.path (PYTHONPATH) by capture/tests only. See `coreai.runtime` in this folder.
"""
__version__ = "0.0.0-qgate-stub"
IS_QGATE_STUB = True
