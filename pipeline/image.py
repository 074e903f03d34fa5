"""Which pixelgen a container image holds, and the check that a job runs the code it was submitted from.

Jobs are pickled by reference: the image must hold the submitting checkout's revision, or the job runs other
code than the one submitted. `make image` bakes the revision into the image (PIXELGEN_IMAGE_INFO, a JSON file
the Dockerfile writes) and into its labels; `docker/convert` writes the labels beside a .sqsh/.sif file
(IMAGE.json). The submission compares that file's revision with the checkout's when it exists
(`pipeline.cluster.record.image_identity`); the job script exports the checkout's revision, and
`pipeline.jobstart` compares it with the image's before anything of the job is unpickled. Light on purpose:
jobstart imports it before the stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INFO_ENV = "PIXELGEN_IMAGE_INFO"
SUBMIT_ENV = "PIXELGEN_SUBMIT_REVISION"
EXIT_MISMATCH = 78  # EX_CONFIG (sysexits.h): not a preemption, the job script does not requeue it


def image_info() -> dict | None:
    """What the image this process runs in says about itself (revision, version, lock, lock_sha256, base), or
    None outside an image."""
    path = os.environ.get(INFO_ENV)
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def commit(revision: str | None) -> str | None:
    """The commit of a revision as pixelgen spells it (`<sha>` or `<sha>-dirty`); None when unknown."""
    if not revision or revision == "unknown":
        return None
    return revision.removesuffix("-dirty")


def mismatch(submitted: str | None, image: str | None, where: str) -> str | None:
    """The message when the checkout's and the image's revisions name different commits, else None."""
    a, b = commit(submitted), commit(image)
    if a is None or b is None or a == b:
        return None
    return (f"{where} holds pixelgen {image}, but the submitting checkout is at {submitted}: the job "
            f"would run other code than the one submitted. Rebuild the image at this checkout (make image, then "
            f"make sqsh/sif) and point the cluster profile's container.image at it, or submit from a checkout "
            f"at {commit(image)} (git checkout {commit(image)})")


def check_job() -> str | None:
    """In a job: the mismatch between the submitting checkout (SUBMIT_ENV) and this image, if any."""
    info = image_info()
    if info is None:
        return None
    return mismatch(os.environ.get(SUBMIT_ENV), info.get("revision"), f"this job's image ({os.environ[INFO_ENV]})")
