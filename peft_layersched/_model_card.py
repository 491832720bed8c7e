"""The loading note in the model card (``README.md``) that PEFT's ``save_pretrained`` writes next to an adapter.

PEFT finds the ``SCHEDULED_LORA`` tuner only after ``import peft_layersched``; without it,
``PeftModel.from_pretrained`` fails with a bare ``KeyError: 'SCHEDULED_LORA'``.  Whoever finds the adapter
folder reads the card first, so the card says it.
"""

from __future__ import annotations

import io
import os

HEADING = "## Loading this adapter (peft-layersched)"

NOTE = """
{heading}

This adapter's `peft_type` is `SCHEDULED_LORA`: it was trained with the package peft-layersched (LoRA with a
layer schedule). Import the package before loading it; without the import, PEFT does not know the type and
fails with `KeyError: 'SCHEDULED_LORA'`.

```python
import peft_layersched  # registers SCHEDULED_LORA with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "{folder}")
```

For vanilla PEFT without the package, `peft_layersched.export_lora(model, out_dir)` writes a plain LoRA copy.

"""


def add_loading_note(adapter_dir: str) -> None:
    """Append the note to the PEFT model card of ``adapter_dir`` (or of the folder above it, where PEFT
    writes the card of a non-default adapter's subfolder), once.  No card, no note: PEFT releases that
    write none (0.3.0) get no new file."""
    for folder in (adapter_dir, os.path.dirname(os.path.normpath(adapter_dir))):
        card = os.path.join(folder, "README.md")
        if not os.path.isfile(card):
            continue
        with io.open(card, encoding="utf-8") as handle:
            text = handle.read()
        if "library_name: peft" not in text:
            continue  # not PEFT's card (a user's README in a parent folder)
        if HEADING not in text:
            name = os.path.basename(os.path.normpath(adapter_dir)) or adapter_dir
            note = NOTE.format(heading=HEADING, folder=name)
            with io.open(card, "w", encoding="utf-8") as handle:
                handle.write(_insert_after_title(text, note))
        return


def _insert_after_title(text: str, note: str) -> str:
    """``text`` with ``note`` after its first ``# `` title (where a reader starts), else at the end."""
    lines = text.splitlines(True)
    for i, line in enumerate(lines):
        if line.startswith("# "):
            return "".join(lines[: i + 1]) + note + "".join(lines[i + 1 :])
    return text + ("" if text.endswith("\n") else "\n") + note
