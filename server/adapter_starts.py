"""Where an adapter job starts when it names ``adapter.start_from``: a served adapter's weights, as a record that
replays (a trained adapter's trajectory up to its served version, or a PEFT folder by path and SHA-256)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sglang_mezo.core.config import MezoConfig
from sglang_mezo.core.lora import AdapterStart, LoraSpec
from sglang_mezo.jobs.errors import InvalidRequest, NotFound
from sglang_mezo.jobs.runner import JobRunner
from sglang_mezo.protocol import AdapterTarget

from .schemas import AdapterShapeIn
from .translate import LoraLaunch, adapter_target


def no_loaded_folders(name: str) -> str | None:
    """A server whose SGLang loaded no adapter from a folder (no ``--enable-lora``)."""
    return None


@dataclass(frozen=True)
class AdapterStarts:
    """Resolves a served adapter's name to the start of a new job: first the adapters this server's jobs trained
    (the version their name serves now), then those SGLang loaded from a PEFT folder."""

    runner: JobRunner
    loaded_folder: Callable[[str], str | None] = no_loaded_folders
    """A name SGLang serves from a folder -> that folder (None: no such adapter)."""

    async def resolve(self, name: str) -> LoraSpec:
        """The spec of an adapter that starts from the one served as ``name``: that adapter's rank, alpha and
        modules, its ``start`` that adapter's weights; a 400 for a name no adapter is served under. On the event
        loop (the runner's jobs are its); a folder is read in a thread."""
        try:
            job = self.runner.adapter(name)
        except NotFound:
            job = None
        if job is not None and job.trajectory is not None and job.adapter_version is not None:
            trajectory = job.trajectory.upto(job.adapter_version.committed_steps)
            return dataclasses.replace(LoraSpec.from_dict(trajectory.adapter), start=AdapterStart(trajectory=trajectory))
        folder = self.loaded_folder(name)
        if folder is None:
            raise InvalidRequest(f"adapter.start_from: no adapter named {name!r} is served here (trained here: "
                                 f"{', '.join(self.runner.adapter_names()) or 'none'})")
        try:
            return await asyncio.to_thread(AdapterStart.of_peft_folder, folder)
        except ValueError as exc:  # the folder is the operator's: say what is wrong, not where it is
            raise InvalidRequest(f"adapter.start_from: adapter {name!r} cannot be trained further: "
                                 f"{str(exc).replace(folder, '<its folder>')}") from exc

    async def target(self, name: str, request: AdapterShapeIn, launch: LoraLaunch,
                     config: MezoConfig) -> AdapterTarget:
        """The adapter a job trains (:func:`~.translate.adapter_target`), from its start if it names one."""
        start = None if request.start_from is None else await self.resolve(request.start_from)
        return adapter_target(name, request, launch, config, start)
