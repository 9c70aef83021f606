"""The black-box runtime: how a black box is run, apart from how it is differentiated.

`Executable` runs a compiled program (argument list, private directory, supervisor, text or JSON
files); `run_instances` fans the instances of a batch out to threads, processes or any executor, a
failure staying with its instance; `record_failure` writes a failing call to a capture file for the
replay.
"""

from blackbox_diff.runtime._capture import FORMAT, record_failure, resolve, unwrap
from blackbox_diff.runtime._executable import Executable
from blackbox_diff.runtime._fanout import WorkerDied, chunk_size_for, run_instances

__all__ = ["FORMAT", "Executable", "WorkerDied", "chunk_size_for", "record_failure", "resolve", "run_instances",
           "unwrap"]
