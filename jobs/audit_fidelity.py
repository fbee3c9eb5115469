"""Ray job entrypoint for the `audit-fidelity` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/audit_fidelity.py --config FILE [key=value ...]
"""

from _entry import run

run("audit-fidelity")
