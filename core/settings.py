"""One settings object for the CLI, the tests and the pages.

Values come from environment variables with the ``KB_`` prefix, then from
``.streamlit/secrets.toml`` (same names, lower-case, without the prefix), then
from the defaults below. Reading secrets.toml ourselves keeps this module free
of Streamlit, so the CLI and the pages see exactly the same configuration.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from core.errors import SettingsError

# Everything here must work offline: no library may try to reach a hub or
# phone home. Set before any of them is imported.
for _var, _val in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_var, _val)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXTENSIONS = ("md", "txt", "rst")
UPLOAD_EXTENSIONS = ("md", "markdown", "txt", "rst", "html", "htm", "xml", "csv")


def redact(url: str) -> str:
    """Hide credentials: ``https://user:token@host`` -> ``https://***@host`` (settings' URLs and sources' alike)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@", r"\1***@", url)


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of extensions, lower-cased, one leading dot dropped (".md" is "md").

    Only one: "../x" stays as typed, so the refusal names what was given, not "/x".
    """
    return tuple(_one_dot(v.strip().lower()) for v in value.split(",") if v.strip())


def _one_dot(ext: str) -> str:
    return ext[1:] if ext.startswith(".") and not ext.startswith("..") else ext


URL_FIELDS = ("chroma_url", "openai_base_url")  # servers' addresses, which may carry credentials


@dataclass(frozen=True)
class Settings:
    """All knobs, named as their ``KB_*`` variable without the prefix."""

    home: Path = Path("data")
    # the shared corpus (bundles and dev_questions.jsonl): the Evaluation page's shipped question set
    corpus: Path = PROJECT_ROOT.parent / "shared" / "corpus"
    # embeddings
    embed_model: str = ""  # a local sentence-transformers folder; empty: the packaged model of the backend
    embed_device: str = ""  # empty: cuda when present, else cpu
    embed_batch_size: int = 64
    # use-m3: the packaged multilingual USE (reads Chinese; README "Retrieval tuning");
    # onnx-int8 / torch: a sentence-transformers model (the packaged MiniLM or
    # embed_model) as int8 ONNX or float; empty: onnx-int8 if embed_model is set, else use-m3.
    embed_backend: str = ""
    model_cache: str = ""  # where derived models (the int8 ONNX export) go; empty: KB_HOME/models/onnx
    # chunking (defaults of a new knowledge base; a live collection keeps its own)
    # Measured in embedding-model tokens. The default USE has no window, so the
    # size is what retrieval quality prefers: 400 gave dev hit@5 0.875 against
    # 0.75 at 200 (BM25 gains context; README "Retrieval tuning"). With MiniLM
    # (256-token window) use 200/30 so no chunk is cut.
    chunk_size: int = 400
    chunk_overlap: int = 40
    splitter: str = "markdown"  # recursive | markdown
    length_unit: str = "tokens"  # chars | tokens
    heading_prefix: bool = True  # embed and BM25-index "heading path\ntext"
    # Each chunk is also split into passages of this size (0: none), searched to
    # find chunks (kb/passages.py): dev hybrid hit@5 0.875 -> 0.917 (README "Retrieval tuning").
    passage_size: int = 120
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    max_file_bytes: int = 1_000_000
    # uploads
    upload_max_bytes: int = 20_000_000
    upload_extensions: tuple[str, ...] = UPLOAD_EXTENSIONS
    # vector store
    chroma_url: str = ""  # empty: embedded PersistentClient in home/chroma
    # seconds a Chroma server may take over one request (connecting: at most 10) before it is "not answering"
    chroma_timeout: float = 60.0
    # LLM
    # auto: the packaged GGUF through transformers in bf16 where the CPU multiplies bf16 (AMX: first token ~5x
    # sooner; AVX512-BF16: ~2x; README "The runtime"), else through llama.cpp | llamacpp | transformers (KB_LLM_PATH) | openai
    llm: str = "auto"
    llm_gguf: str = ""  # empty: join the packaged Qwen2.5-Coder GGUF into home/models
    llm_path: str = ""  # local transformers checkpoint folder (InternLM)
    llm_max_tokens: int = 512
    # 0: greedy, the same answer to the same question over the same sources every time (README "Answers": two runs
    # of blind20 word for word; at 0.1 half the answers were worded differently run to run, with the same facts)
    llm_temperature: float = 0.0
    llm_n_ctx: int = 4096
    # tokens that transformers drafts per step by finding the answer's last words in the prompt (0: off): an answer
    # that quotes its sources is written ~1.6x faster on two cores (README "Answers"). 3 = the 4 rows that the
    # 4-bit decode kernels take (core/decode_weights.py); llama.cpp and OpenAI servers ignore it
    llm_prompt_lookup: int = 3
    llm_threads: int = 0  # 0: all cores
    # tokens of file excerpts the answer prompt holds in all (kb/answer/context.py): the wait before the first word
    # against the facts stated (README "Answers": 420 tokens ~8 s and fewer facts; whole chunks ~27 s)
    context_tokens: int = 700
    # answers also search the question in the other language, translated by the model first (kb/answer/translate.py):
    # more cross-lingual questions found, for one short generation before the search (README "Answers"). off; auto:
    # only when BM25's and dense's first five share no chunk; always (true/false read as always/off)
    translate_questions: str = "off"
    llm_preload: bool = True  # the dashboard starts loading the LLM in the background as soon as it starts
    openai_base_url: str = ""
    openai_model: str = ""
    openai_api_key: str = field(default="", repr=False)
    # seconds the model server may stay silent (before the first word, or between two) before the answer fails
    openai_timeout: float = 120.0
    # retrieval
    retrieval_mode: str = "hybrid"
    top_k: int = 5
    reranker_path: str = ""
    # dashboard
    admin_password: str = field(default="", repr=False)
    # how long an admin sign-in lasts (KB_ADMIN_SESSION=12h; 0/off: until the tab closes or the server restarts)
    admin_session: float = 43200.0
    # scheduled sync (KB_SYNC_EVERY=15m): seconds between fetches of every git source; 0: off
    sync_every: float = 0.0
    # scheduled snapshots (KB_SNAPSHOT_EVERY=1d): a checked archive with the clones in KB_HOME/snapshots every
    # interval, the newest KB_SNAPSHOT_KEEP of them kept; 0: off (README "Snapshots")
    snapshot_every: float = 0.0
    snapshot_keep: int = 7
    # the log (KB_HOME/logs/kb.jsonl): keep the text of questions in search and answer records only when true
    log_queries: bool = False

    def __repr__(self) -> str:
        """Every field but the secrets, the servers' URLs without their credentials: a traceback, a log line or a
        test's failure may print the settings, and ``KB_CHROMA_URL`` may hold ``user:password@``."""
        shown = (f"{f.name}={redact(v) if f.name in URL_FIELDS and v else v!r}"
                 for f in fields(self) if f.repr for v in [getattr(self, f.name)])
        return f"Settings({', '.join(shown)})"

    @property
    def chroma_path(self) -> Path:
        return self.home / "chroma"

    @property
    def manifest_path(self) -> Path:
        return self.home / "manifest.sqlite"

    @property
    def repos_path(self) -> Path:
        return self.home / "repos"

    @property
    def cache_path(self) -> Path:
        """What can be rebuilt from the rest (BM25 matrices): deleting it costs time, never data."""
        return self.home / "cache"

    @property
    def models_path(self) -> Path:
        return self.home / "models"

    def with_(self, **changes: object) -> "Settings":
        return replace(self, **changes)


def _secrets(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_INTERVAL = 365 * 86400


def duration(text: str, units: str = "smhdw") -> float | None:
    """Seconds of ``30s``, ``15m``, ``1h30m``, ``2d`` or ``1w`` (spaces and case aside), or None: one reading for the
    schedules' intervals (which take no weeks) and ``kb log --since``."""
    compact = text.strip().lower().replace(" ", "")
    part = rf"(\d+(?:\.\d+)?)([{units}])"
    if not re.fullmatch(rf"(?:{part})+", compact):
        return None
    return sum(float(n) * DURATION_UNITS[u] for n, u in re.findall(part, compact))


def parse_interval(raw: object, name: str = "KB_SYNC_EVERY") -> float:
    """An interval such as ``30s``, ``15m``, ``1h``, ``1h30m`` or ``1d``, in seconds; ``0``, ``off`` or empty: 0 (off).

    A bare number is refused (is ``15`` seconds or minutes?), and so is anything
    else that is not a positive amount of s, m, h or d.
    """
    text = str(raw).strip().lower().replace(" ", "")
    if text in {"", "0", "0s", "0m", "0h", "off", "none", "false"}:
        return 0.0
    seconds = duration(text, "smhd")
    if not seconds:
        raise SettingsError(
            f"{name}={raw!r} is not an interval: give a number with s, m, h or d (e.g. 30s, 15m, 1h, 1h30m, 1d), or 0 for off"
        )
    if seconds > MAX_INTERVAL:  # a wait past threading's limit failed with OverflowError after the first pass
        raise SettingsError(f"{name}={raw!r} is longer than a year: give at most 365d, or 0 for off")
    return seconds


TRANSLATE_MODES = ("off", "auto", "always")


def translate_mode(raw: object, name: str = "KB_TRANSLATE_QUESTIONS") -> str:
    """off, auto or always; the yes/no words of a switch as always/off (the setting was one until the forty-third
    stop)."""
    text = str(raw).strip().lower()
    text = {"1": "always", "true": "always", "yes": "always", "on": "always",
            "0": "off", "false": "off", "no": "off", "": "off"}.get(text, text)
    if text not in TRANSLATE_MODES:
        raise SettingsError(f"{name}={raw!r}: use off, auto (when BM25 and dense disagree) or always")
    return text


def _coerce(raw: object, default: object, name: str) -> object:
    if name in ("sync_every", "snapshot_every", "admin_session"):
        return parse_interval(raw, f"KB_{name.upper()}")
    if name == "translate_questions":
        return translate_mode(raw)
    if isinstance(default, tuple):
        return split_list(raw) if isinstance(raw, str) else tuple(str(v).lower() for v in raw)  # type: ignore[union-attr]
    if isinstance(default, Path):
        return Path(str(raw)).expanduser()
    try:
        if isinstance(default, bool):
            return str(raw).lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)  # type: ignore[arg-type]
        if isinstance(default, float):
            return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"KB_{name.upper()}={raw!r} is not a valid {type(default).__name__}") from exc
    return str(raw)


def load_settings(env: dict[str, str] | None = None, secrets_path: Path | None = None) -> Settings:
    """Build settings from the environment and secrets.toml; env wins."""
    env = dict(os.environ if env is None else env)
    secrets = _secrets(secrets_path or PROJECT_ROOT / ".streamlit" / "secrets.toml")
    values: dict[str, object] = {}
    for f in fields(Settings):
        default = getattr(Settings, f.name) if f.name != "extensions" else DEFAULT_EXTENSIONS
        raw = env.get(f"KB_{f.name.upper()}")
        if raw is None:
            raw = secrets.get(f.name)
        if raw is not None:
            values[f.name] = _coerce(raw, default, f.name)
    _in_range(values, "context_tokens", 100, 20_000, "100 to 20000 (tokens of excerpts in the answer prompt)")
    _in_range(values, "llm_prompt_lookup", 0, 64, "0 (off) to 64 (tokens drafted from the prompt per step)")
    _in_range(values, "llm_temperature", 0, 2, "0 (greedy: the same answer every time) to 2")
    _in_range(values, "openai_timeout", 1, 3600, "1 to 3600 (seconds the model server may stay silent)")
    _in_range(values, "chroma_timeout", 1, 3600, "1 to 3600 (seconds a Chroma server may take to answer)")
    _in_range(values, "snapshot_keep", 1, 10_000, "1 or more (the scheduled snapshots kept, newest first)")
    return Settings(**values)  # type: ignore[arg-type]


def _in_range(values: dict[str, object], name: str, low: float, high: float, what: str) -> None:
    """Refuse a number the code would misuse (a prompt with no excerpts, a negative draft) with the setting's name."""
    if name in values and not low <= float(values[name]) <= high:  # type: ignore[arg-type]
        raise SettingsError(f"KB_{name.upper()}={values[name]}: use {what}")
