"""The backend contract: a small Protocol and the plain data that crosses it.

A backend turns a plan into a real fine-tune. It does three things and nothing else:

* ``prepare`` loads the base model the way the plan says (quantization, dtypes, attention,
  k-bit preparation) and attaches the adapters, reporting the memory of each phase to a
  ``probe`` (``backends.measure``);
* ``train`` runs the plan's training loop (batch, accumulation, precision, optimizer,
  checkpointing) for ``settings.steps`` optimizer steps or ``settings.epochs`` epochs, with the
  given ``transformers.TrainerCallback`` objects attached — measuring is one of those callbacks,
  so every backend is measured by the same code (it also records the arguments the trainer
  really ran with);
* ``save_adapter`` writes the trained adapter (safetensors) to a folder.

Backends share helpers by composition (``backends.hf_train``), never by inheritance. A
third-party package adds one by declaring an entry point in the group ``qplan.backends``
(see ``backends.registry``). This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: values of ``Measurement.status``
STATUSES = ("running", "ok", "oom", "error", "interrupted")


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a local folder with config.json, weights, tokenizer.

    ``random_init`` records that the folder was built by qplan from the plan's config with
    random weights (``backends.modelsrc``), with ``seed``.
    """

    path: Path
    random_init: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class TrainSettings:
    """Run settings that are not in the plan (the plan fixes everything memory depends on)."""

    steps: int | None
    epochs: float | None
    learning_rate: float
    output_dir: Path
    seed: int = 0


@dataclass
class Prepared:
    """What ``prepare`` hands to ``train``: the adapted model, its tokenizer, and facts read
    while loading (``weights_footprint`` is ``get_memory_footprint()`` of the base model after
    k-bit preparation and before adapters; ``params`` PEFT's ``get_nb_trainable_parameters()``)."""

    model: Any
    tokenizer: Any
    device: str
    weights_footprint: int
    params: dict[str, int]
    notes: list[str] = field(default_factory=list)
    #: an optimizer the backend made itself (PEFT's LoRA-FA, which freezes ``lora_A`` before anything is counted)
    optimizer: Any = None


@runtime_checkable
class Backend(Protocol):
    """A trainer that can run a plan. Implementations are plain classes with these members."""

    name: str

    def prepare(self, plan: dict[str, Any], source: ModelSource, device: str, probe: Any) -> Prepared:
        """Load the base model per ``plan`` on ``device`` and attach the adapters."""
        ...

    def train(self, prepared: Prepared, dataset: Any, plan: dict[str, Any], settings: TrainSettings,
              callbacks: list[Any]) -> None:
        """Train ``prepared.model`` on ``dataset`` (a sequence of ``{"input_ids", "labels"}``)."""
        ...

    def save_adapter(self, prepared: Prepared, folder: Path) -> Path:
        """Save the adapter to ``folder``; return the path of its safetensors file."""
        ...


@dataclass
class Failure:
    """Why a run stopped early. ``kind``: oom | error | interrupted | crashed."""

    kind: str
    message: str
    step: int | None = None
    phase: str | None = None
    exception: str | None = None
    traceback: str | None = None
    at: float | None = None  # when it was caught (Unix time): the first of several ranks' failures is the cause


@dataclass
class Measurement:
    """Everything a run measured; ``to_json`` is the ``measured`` section of measured.json.

    ``memory`` holds counters named for what they are (see ``backends.measure``): on the CPU
    ``tensor_peak`` (live tensor storages); on CUDA ``peak_allocated``, ``peak_reserved``,
    ``device_used``; always ``weights`` and ``weights_footprint``, and ``phases``.
    """

    params: dict[str, int] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    loss: list[float] = field(default_factory=list)
    adapter_file_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
