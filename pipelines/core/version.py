"""The installed featscope version, recorded in run.json and every Parquet file."""

from importlib.metadata import PackageNotFoundError, version

try:
    FEATSCOPE_VERSION = version("featscope")
except PackageNotFoundError:  # running from a source tree that was never installed
    FEATSCOPE_VERSION = "0+unknown"
