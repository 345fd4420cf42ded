"""Where the embedded demo's files live inside the package."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_ADAPTERS_DIR = DEMO_DIR / "adapters"
DEMO_REQUESTS = DEMO_DIR / "requests.jsonl"


def demo_adapter_dirs() -> dict[str, Path]:
    """Demo adapter name -> its PEFT directory."""
    return {p.name: p for p in sorted(DEMO_ADAPTERS_DIR.iterdir()) if (p / "adapter_config.json").is_file()}
