"""Ray job entrypoint for the `select` stage (not select.py: that would shadow the stdlib module).

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/select_checkpoint.py --config FILE [key=value ...]
"""

from _entry import run

run("select")
