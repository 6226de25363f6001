"""Fleet mode: realign many fine-tuned adapters (a list, a local glob or a Hub listing) against one safety patch,
sequentially or on Ray, each result written to ``DIR/<name>/`` or pushed, with a summary table, per-adapter error
rows and resume.

- `inputs`: where the adapters come from and each one's result name;
- `work`: one adapter, start to finish (the function every engine runs);
- `engines`: ``sequential`` and ``ray``; `payload`: the shared patch as zero-copy buffers for Ray's object store;
- `summary`: ``summary.json`` / ``summary.md``;
- `driver`: `realign_fleet`, the entry point; `command`: the ``nlsr realign`` flags of fleet mode.
"""

from .driver import FleetReport, realign_fleet
from .engines import ENGINES
from .inputs import collect_specs
from .work import FleetSettings

__all__ = ["ENGINES", "FleetReport", "FleetSettings", "collect_specs", "realign_fleet"]
