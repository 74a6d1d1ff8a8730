"""What the routes work with, as FastAPI dependencies: the job runner, the request translator and the job
defaults, held by the app (``app.state.mezo``) rather than by closures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from sglang_mezo.core.recipe import JobDefaults
from sglang_mezo.core.master import Precision
from sglang_mezo.jobs.job import Job
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.options import Limits

from .adapter_starts import AdapterStarts
from .files import FileAccess
from .fine_tuning.files import FileStore
from .fleet.role import FleetRole
from .limits import StreamSlots
from .translate import LoraLaunch, Translator

if TYPE_CHECKING:
    from .fine_tuning.service import FineTuning


@dataclass(frozen=True)
class MezoContext:
    runner: JobRunner
    translator: Translator
    defaults: JobDefaults
    """A job's hyper-parameters where the request leaves them out: the ``--mezo-*`` flags given, else the recipe."""
    limits: Limits
    files: FileAccess
    base_model: str
    precision: Precision = Precision("float32")
    openai_files: FileStore = FileStore(None, 1)
    """Uploads of the OpenAI files API (off without a data folder)."""
    fine_tuning: FineTuning | None = None
    """OpenAI's fine-tuning jobs over ``runner`` (None: the OpenAI routes answer 503)."""
    lora: LoraLaunch = LoraLaunch()
    """The LoRA flags (adapter jobs)."""
    starts: AdapterStarts | None = None
    """Where an adapter job that names ``start_from`` starts (None: from the adapters ``runner``'s jobs trained)."""
    fleet: FleetRole | None = None
    """This server's part in a fleet (None: it is not in one)."""
    streams: StreamSlots = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", StreamSlots(self.limits.max_event_streams))
        if self.starts is None:
            object.__setattr__(self, "starts", AdapterStarts(self.runner))

    def attach(self, app: FastAPI) -> None:
        app.state.mezo = self


def mezo_context(request: Request) -> MezoContext:
    return request.app.state.mezo


def job_in_path(job_id: str, context: Annotated[MezoContext, Depends(mezo_context)]) -> Job:
    """The job a ``/jobs/{job_id}`` route names (404 if there is none)."""
    return context.runner.job(job_id)


Context = Annotated[MezoContext, Depends(mezo_context)]
PathJob = Annotated[Job, Depends(job_in_path)]
