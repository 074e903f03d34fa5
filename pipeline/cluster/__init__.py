"""Cluster profiles and the SLURM side of a run: what each stage's job asks for, the container it runs in, the
run record, and the state of a run's jobs read from squeue and the run folder (no sacct needed).

A profile is `slurm/<name>.yaml` (or any YAML path) typed by `ClusterProfile`; `--cluster NAME` selects it.
The experiment config says what to train; the profile says where: partition, GPUs per node, nodes per
training stage, time limits, the preemption signal, the container.

- `profile`: the profile schema, finding and loading a profile, and the checks run before submitting.
- `jobs`: each stage's job parameters, the container's mounts and python command, the requeue lines.
- `record`: the run record of a run folder's submissions.
- `status`: squeue, each stage's state and training progress, and cancelling a run's jobs.
"""

from pipeline.cluster.jobs import (EXIT_PREEMPTED, attempts_file, container_mounts, job_parameters, python_command,
                                   requeue_lines, secret_names)
from pipeline.cluster.profile import (RUNTIMES, SIGNALS, TRAIN_STAGES, ClusterProfile, ContainerConfig,
                                      StageTimes, TrainNodes, check_experiment, check_partitions, load_profile,
                                      profile_dirs, profile_path, tasks_per_node, validate_profile, world_size)
from pipeline.cluster.record import RECORD, add_submission, check_image, image_identity, latest_jobs, read_record
from pipeline.cluster.status import (ACTIVE, FAILED, active_jobs, cancel, queue, stage_states,
                                     training_progress)

__all__ = [
    "ACTIVE", "EXIT_PREEMPTED", "attempts_file", "FAILED", "RECORD", "RUNTIMES", "SIGNALS", "TRAIN_STAGES", "ClusterProfile",
    "ContainerConfig", "StageTimes", "TrainNodes", "active_jobs", "add_submission", "cancel", "check_experiment",
    "check_image", "check_partitions", "container_mounts", "image_identity", "job_parameters", "latest_jobs", "load_profile",
    "profile_dirs", "profile_path", "python_command", "queue", "read_record", "requeue_lines", "secret_names",
    "stage_states", "tasks_per_node", "training_progress", "validate_profile", "world_size",
]
