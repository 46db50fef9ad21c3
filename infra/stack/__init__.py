"""The local service stack: Prefect server + UI, MLflow server + UI, SeaweedFS S3, all on 127.0.0.1.

* `process`: process supervision of any service: pid and log files, locks, start, health
  waiting, stop, ports (`ServiceSpec`, `start_service`, `wait_healthy`, `stop_service`, ...).
* `services`: which services the stack runs and how (`prefect_spec`, `mlflow_spec`,
  `seaweed_spec`, `worker_spec`), the stack's commands (`stack_up`, `stack_status`,
  `stack_down`) and the environment a user exports to use it (`stack_env`, `write_stack_env`).

Everything is importable from here: ``from infra.stack import stack_up, read_pid``.
"""

from infra.stack.process import (
    ServiceSpec,
    ServiceStatus,
    check_ports_free,
    free_loopback_port,
    log_path,
    pid_path,
    port_free,
    read_pid,
    running_or_started,
    service_lock,
    service_status,
    start_service,
    stop_service,
    wait_healthy,
)
from infra.stack.process import _http_ok as _http_ok
from infra.stack.services import (
    GRPC_OFFSET,
    PREFECT_PORT_FILE,
    REPO_DIR,
    WORK_POOL,
    SeaweedPorts,
    answers_as_prefect,
    describe,
    local_prefect_port,
    mlflow_spec,
    prefect_spec,
    remember_prefect_port,
    seaweed_ports,
    seaweed_spec,
    stack_down,
    stack_env,
    stack_specs,
    stack_status,
    stack_up,
    worker_spec,
    write_stack_env,
)

__all__ = [
    "GRPC_OFFSET",
    "PREFECT_PORT_FILE",
    "REPO_DIR",
    "WORK_POOL",
    "SeaweedPorts",
    "ServiceSpec",
    "ServiceStatus",
    "answers_as_prefect",
    "check_ports_free",
    "describe",
    "free_loopback_port",
    "local_prefect_port",
    "log_path",
    "mlflow_spec",
    "pid_path",
    "port_free",
    "prefect_spec",
    "read_pid",
    "remember_prefect_port",
    "running_or_started",
    "seaweed_ports",
    "seaweed_spec",
    "service_lock",
    "service_status",
    "stack_down",
    "stack_env",
    "stack_specs",
    "stack_status",
    "stack_up",
    "start_service",
    "stop_service",
    "wait_healthy",
    "worker_spec",
    "write_stack_env",
]
