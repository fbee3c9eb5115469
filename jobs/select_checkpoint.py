"""Ray job entrypoint (not select.py: that name would shadow the standard library module): `ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/select_checkpoint.py --config FILE [key=value ...]`."""

from _entry import run

run("select")
