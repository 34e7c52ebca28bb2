"""QA samples read from JSONL/JSON files: LLaVA / Qwen conversations and EgoSchema-style multiple choice.

A data file is JSONL (one record per line; blank lines are ignored) or a JSON list of records.
Relative media paths are taken from `image_root`, by default the data file's own directory.

``conversations`` -- one question and its answer from a chat::

    {"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "Q"}]},
                  {"role": "assistant", "content": "A"}]}

  Media: top-level ``image`` / ``images`` (a path or a list), ``video`` / ``videos`` (a video file,
  or a list of frame images), and image/video parts of the user turn's content. The sample is the
  first exchange: the first user turn and the assistant turn right after it (system turns are
  ignored, later turns too). ``<image>`` / ``<video>`` placeholders are removed from the text, since
  the frames are always put before the question (see batching.messages_for). A question with
  lettered option lines ("\\nA. ...") and a one-letter answer counts as multiple choice; any other
  is open-ended (num_choices 0: chance accuracy 0).

``egoschema`` -- multiple choice over a clip::

    {"q_uid": "...", "question": "...", "option 0": "...", ..., "option 4": "...", "answer": 2,
     "video": "clip.mp4"}            # or "options": [...]; or "frames": ["f0.png", ...] / "video": [...]

  The question is the stem followed by lettered option lines, exactly as the synthetic
  multiple-choice questions are ("stem\\nA. x\\nB. y"), and the answer is the letter of option
  ``answer`` (a 0-based index).

Frames: images are read with PIL (EXIF orientation applied) and resized with qwen-vl-utils'
``fetch_image`` (RGB, sides on the 28 px grid, pixel count within [min_pixels, max_pixels]).
A video is a list of frames: a frame list keeps at most ``max_frames`` of its frames, evenly
spaced; a video file is sampled at ``fps`` frames per second (at most ``max_frames``, at least one)
and decoded with PyAV (installed with qwen-vl-utils), or else with qwen-vl-utils' ``fetch_video``
when torchcodec or decord is installed. Every frame of a sample becomes one image of the
QASample, as the synthetic two-frame questions are.

Bad data is found when the file is loaded, before any training: a malformed line, a missing key,
a missing or unreadable image, an answer index out of range, a sample longer than ``max_length``
tokens (counted with the student's processor from the frames' sizes; a video file is decoded for
it). Each problem reads
``<file>:<line>: <what is wrong>``; with ``on_bad_sample="error"`` the first one raises a
FirstSightError, with ``"skip"`` the record is left out, counted in ``skipped``, listed in
``problems`` and logged once. Images are checked with PIL's ``verify`` and video files by decoding
their first frame; the frames themselves are decoded on demand in ``__getitem__``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from hydra.utils import to_absolute_path
from PIL import Image, ImageOps

from firstsight.core.errors import FirstSightError
from firstsight.data.batching import sample_length
from firstsight.data.synthetic import QASample, _option_line

__all__ = ["BAD_SAMPLE_POLICIES", "FORMATS", "FileQA", "MediaSettings", "file_split", "is_file_data", "resolve_path"]

log = logging.getLogger(__name__)

FORMATS: Tuple[str, ...] = ("conversations", "egoschema")
BAD_SAMPLE_POLICIES: Tuple[str, ...] = ("error", "skip")
OPTION_LETTERS = string.ascii_uppercase
MIN_OPTIONS = 2
PATCH_SIZE = 14  # Qwen2-VL: 14 px patches merged 2x2, so frames are sized on a 28 px grid
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' smart_resize refuses longer sides

_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant"}
_ROLES = {**_USER_ROLES, **_ASSISTANT_ROLES, "system": "system"}
_PLACEHOLDER = re.compile(r"<image>|<video>")
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>")  # Qwen's chat/vision tokens: text must not fake them
_OPTION_LINE = re.compile(r"^([A-Z])\. ", re.MULTILINE)
_OPTION_KEY = re.compile(r"^option (\d+)$")
_WHITESPACE = re.compile(r"\s*")

_logged: set = set()  # problems already logged in this process (a file read for two splits logs once)


class _Bad(Exception):
    """One record is unusable; the message says why (the loader adds file and line)."""


# ----------------------------------------------------------------------------- config


def is_file_data(data_cfg: Any) -> bool:
    """Whether a `data` config reads files (it names a `format`) rather than generating samples."""
    try:
        return getattr(data_cfg, "format", None) is not None
    except Exception:  # a struct DictConfig without the key
        return False


def resolve_path(path: Union[str, Path]) -> Path:
    """An absolute path; relative ones are from the directory run.py was started in
    (Hydra's original working directory; the current one outside Hydra)."""
    return Path(to_absolute_path(str(Path(str(path)).expanduser())))


def file_split(data_cfg: Any, split: str, processor: Any = None) -> FileQA:
    """The `split` ("train" | "validation") that a file-based `data` config names. A file read
    before in this process, unchanged since, is not read again (validation reads the splits before
    the job creates its run; the task then gets the same datasets). With `data.max_length` set,
    samples are measured with `processor` (the student's, which the caller holds)."""
    key = "train_file" if split == "train" else "validation_file"
    raw = data_cfg[key]
    if not raw:
        raise FirstSightError(
            f"data.{key} is not set, but this job reads the {split} split: give a .jsonl or .json file "
            f"(data={data_cfg.name}; e.g. data.{key}=tests/fixtures/{_FIXTURES[data_cfg.format]})"
        )
    path = resolve_path(raw)
    image_root = resolve_path(data_cfg.image_root) if data_cfg.image_root else None
    media = MediaSettings(data_cfg.max_pixels, data_cfg.min_pixels, data_cfg.fps, data_cfg.max_frames)
    max_length = data_cfg.get("max_length")
    measured_by = _measured_by(processor) if max_length is not None else None  # lengths depend on the processor
    try:
        stat = path.stat()
        cache_key: Any = (
            str(path),
            stat.st_mtime_ns,
            stat.st_size,
            data_cfg.format,
            split,
            str(image_root),
            media,
            data_cfg.on_bad_sample,
            max_length,
            measured_by,
        )
    except OSError:  # FileQA says what is wrong with it
        cache_key = None
    if cache_key is not None and cache_key in _READ:
        return _READ[cache_key]
    if max_length is not None and processor is None:  # the caller holds the student's processor
        raise FirstSightError(
            f"data.max_length={max_length} needs the student's processor to count a sample's "
            "tokens: pass it to load_split"
        )
    dataset = FileQA(
        path,
        data_cfg.format,
        split=split,
        image_root=image_root,
        media=media,
        on_bad_sample=data_cfg.on_bad_sample,
        max_length=max_length,
        processor=processor,
    )
    if cache_key is not None:
        while len(_READ) >= 4:
            _READ.pop(next(iter(_READ)))
        _READ[cache_key] = dataset
    return dataset


def _measured_by(processor: Any) -> Any:
    """Which processor counts a sample's tokens: its tokenizer's name or path and size."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return None
    return (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))


_READ: Dict[Any, FileQA] = {}  # datasets read in this process (file_split), by file, its state and settings


_FIXTURES = {"conversations": "conversations.jsonl", "egoschema": "egoschema.jsonl"}


@dataclass(frozen=True)
class MediaSettings:
    max_pixels: int = 448 * 448  # frames above this are downscaled
    min_pixels: int = 56 * 56  # frames below this are upscaled
    fps: float = 2.0  # frames sampled per second of a video file
    max_frames: int = 8  # at most this many frames per video (file or frame list)


# ----------------------------------------------------------------------------- media


@dataclass(frozen=True)
class _Media:
    kind: str  # "image" | "frames" | "video" (a video file)
    paths: Tuple[Path, ...]  # the image, the frames kept, or the video file
    sizes: Tuple[Tuple[int, int], ...] = ()  # (width, height) of each image as stored (not for a video file)


def _evenly(items: Sequence[Any], count: int) -> List[Any]:
    """`count` of `items`, evenly spaced, first and last included (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _fit(image: Image.Image, media: MediaSettings) -> Image.Image:
    """RGB, sides on the 28 px grid, pixel count within [min_pixels, max_pixels] (qwen-vl-utils)."""
    from qwen_vl_utils import fetch_image  # deferred: qwen-vl-utils imports torch; only file data needs it

    return fetch_image(
        {"image": image, "min_pixels": media.min_pixels, "max_pixels": media.max_pixels}, image_patch_size=PATCH_SIZE
    )


def _fitted_size(size: Tuple[int, int], media: MediaSettings) -> Tuple[int, int]:
    """The (width, height) `_fit` gives a frame of `size`, computed without its pixels."""
    from qwen_vl_utils import smart_resize  # deferred: qwen-vl-utils imports torch; only file data needs it

    width, height = size
    height, width = smart_resize(
        height, width, factor=PATCH_SIZE * 2, min_pixels=media.min_pixels, max_pixels=media.max_pixels
    )
    return width, height


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)  # a loaded copy: the file is closed on return


def _check_image(path: Path) -> Tuple[int, int]:
    """The image's (width, height) as stored, once PIL has verified the file."""
    if not path.is_file():
        raise _Bad(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise _Bad(f"cannot read image {path}: {err}") from None
    if min(size) < 1 or max(size) / min(size) > MAX_ASPECT_RATIO:
        raise _Bad(
            f"image {path} is {size[0]}x{size[1]}: the longer side may be at most {MAX_ASPECT_RATIO}x the shorter"
        )
    return size


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: import blocked
        return False


def _video_backend() -> Optional[str]:
    """PyAV (installed with qwen-vl-utils), else qwen-vl-utils' fetch_video where it has a reader
    (torchcodec or decord; its torchvision reader is gone from torchvision >= 0.24), else None."""
    if _installed("av"):
        return "pyav"
    if _installed("torchcodec") or _installed("decord"):
        return "qwen-vl-utils"
    return None


def _no_video_backend(path: Path) -> str:
    return (
        f"cannot read video file {path}: no video reader is installed (PyAV, or torchcodec / decord for "
        'qwen-vl-utils). Give the clip as a list of frame images instead ("video": ["f0.jpg", ...] or '
        '"frames": [...]), or install one of them (pip install av)'
    )


def _check_video(path: Path) -> None:
    if not path.is_file():
        raise _Bad(f"video file not found: {path}")
    backend = _video_backend()
    if backend is None:
        raise FirstSightError(_no_video_backend(path))  # the machine lacks a reader: not a bad sample
    if backend != "pyav":
        return  # qwen-vl-utils opens the file only to decode it
    import av  # deferred: PyAV is an optional video reader (_video_backend)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _Bad(f"{path} has no video stream")
            next(container.decode(video=0))
    except _Bad:
        raise
    except StopIteration:
        raise _Bad(f"video {path} has no frames") from None
    except Exception as err:
        raise _Bad(f"cannot read video {path}: {err}") from None


def _sample_indices(total: int, video_fps: Optional[float], media: MediaSettings) -> List[int]:
    """Frames to keep from a clip of `total` frames: `fps` per second, 1..max_frames, evenly spaced."""
    count = media.max_frames
    if video_fps and video_fps > 0:
        count = min(count, max(1, round(total / video_fps * media.fps)))
    return _evenly(range(total), max(1, min(count, total)))


def _read_video_pyav(path: Path, media: MediaSettings) -> List[Image.Image]:
    import av  # deferred: PyAV is an optional video reader (_video_backend)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames
        if not total:  # the container does not say: count the packets that hold a frame
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        keep = set(_sample_indices(total, float(rate) if rate else None, media))
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                frames.append(_fit(frame.to_image(), media))
            if i >= max(keep):
                break
    if not frames:
        raise _Bad(f"video {path} has no frames")
    return frames


def _read_video_qwen(path: Path, media: MediaSettings) -> List[Image.Image]:
    from qwen_vl_utils import fetch_video  # deferred: qwen-vl-utils imports torch; only file data needs it

    video = fetch_video(
        {
            "video": str(path),
            "fps": media.fps,
            "min_frames": 1,
            "max_frames": max(2, media.max_frames),
            "min_pixels": media.min_pixels,
            "max_pixels": media.max_pixels,
        },
        image_patch_size=PATCH_SIZE,
    )  # (T, C, H, W) float in [0, 255]
    frames = video.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(frame) for frame in _evenly(list(frames), media.max_frames)]


def _load_media(item: _Media, media: MediaSettings) -> List[Image.Image]:
    if item.kind == "video":
        backend = _video_backend()
        if backend is None:
            raise FirstSightError(_no_video_backend(item.paths[0]))
        reader = _read_video_pyav if backend == "pyav" else _read_video_qwen
        return reader(item.paths[0], media)
    return [_fit(_open_image(path), media) for path in item.paths]


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Record:
    where: str  # "<file>:<line>"
    media: Tuple[_Media, ...]
    question: str
    answer: str
    kind: str
    num_choices: int  # 0: open-ended


class _Parser:
    """Turns one JSON record into a _Record, or raises _Bad."""

    def __init__(self, root: Path, media: MediaSettings):
        self.root = root
        self.media = media

    # media paths

    def path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"{what} must be a path (a non-empty string), got {value!r}")
        if value.startswith(("http://", "https://", "data:")):
            raise _Bad(f"{what} {value[:60]!r} is not a local file: download it and give its path (runs are offline)")
        if value.startswith("file://"):
            value = value[len("file://") :]
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    def image(self, value: Any, what: str = "image") -> _Media:
        path = self.path(value, what)
        return _Media("image", (path,), (_check_image(path),))

    def video(self, value: Any, what: str = "video") -> _Media:
        """A video file, or a list of frame images (of which at most max_frames are kept)."""
        if isinstance(value, (list, tuple)):
            if not value:
                raise _Bad(f"{what} is an empty list of frames")
            frames = _evenly([self.path(v, f"{what}[{i}]") for i, v in enumerate(value)], self.media.max_frames)
            return _Media("frames", tuple(frames), tuple(_check_image(frame) for frame in frames))
        path = self.path(value, what)
        _check_video(path)
        return _Media("video", (path,))

    def top_level_media(self, record: Dict[str, Any]) -> List[_Media]:
        found: List[_Media] = []
        for key in ("image", "images"):
            if key in record:
                values = record[key] if isinstance(record[key], list) else [record[key]]
                found += [
                    self.image(v, f"'{key}'" if len(values) == 1 else f"'{key}'[{i}]") for i, v in enumerate(values)
                ]
        if "video" in record:
            found.append(self.video(record["video"], "'video'"))
        if "videos" in record:
            if not isinstance(record["videos"], list):
                raise _Bad(f"'videos' must be a list of videos, got {record['videos']!r}")
            found += [self.video(v, f"'videos'[{i}]") for i, v in enumerate(record["videos"])]
        return found

    # text

    @staticmethod
    def text(value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _Bad(f"{what} must be a string, got {type(value).__name__} {value!r}"[:200])
        token = _SPECIAL_TOKEN.search(value)
        if token:
            raise _Bad(f"{what} contains the special token {token.group()!r}, which would break the chat format")
        text = value.strip()
        if not text:
            raise _Bad(f"{what} is empty")
        return text

    # conversations

    def conversation(self, record: Dict[str, Any]) -> Tuple[List[_Media], str, str]:
        if "conversations" in record:
            turns = self._turns(record["conversations"], "conversations", "from", "value")
        elif "messages" in record:
            turns = self._turns(record["messages"], "messages", "role", "content")
        else:
            raise _Bad("neither 'conversations' (LLaVA style) nor 'messages' (Qwen/OpenAI style) is present")
        users = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
        if not users:
            raise _Bad("no user turn (from 'human' / role 'user')")
        first = users[0]
        if first + 1 >= len(turns) or turns[first + 1][0] != "assistant":
            raise _Bad(f"the first user turn ({turns[first][2]}) is not followed by an assistant turn")
        (_, user, user_at), (_, assistant, assistant_at) = turns[first], turns[first + 1]
        inline, question = self._content(user, user_at, allow_media=True)
        _, answer = self._content(assistant, assistant_at, allow_media=False)
        question = self.text(question, f"the question ({user_at})")
        answer = self.text(answer, f"the answer ({assistant_at})")
        return inline + self.top_level_media(record), question, answer

    @staticmethod
    def _turns(value: Any, key: str, role_key: str, content_key: str) -> List[Tuple[str, Any, str]]:
        if not isinstance(value, list):
            raise _Bad(f"'{key}' must be a list of turns, got {type(value).__name__}")
        turns = []
        for i, turn in enumerate(value):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
                raise _Bad(f"{where} must be an object with '{role_key}' and '{content_key}'")
            role = _ROLES.get(str(turn[role_key]).lower())
            if role is None:
                raise _Bad(f"{where} has {role_key}={turn[role_key]!r}; expected one of {sorted(_ROLES)}")
            turns.append((role, turn[content_key], where))
        return [t for t in turns if t[0] != "system"]

    def _content(self, content: Any, where: str, allow_media: bool) -> Tuple[List[_Media], str]:
        """Media and text of a turn's content: a string, or a list of typed parts (Qwen/OpenAI)."""
        if isinstance(content, str):
            return [], _PLACEHOLDER.sub("", content)
        if not isinstance(content, list):
            raise _Bad(f"{where} content must be a string or a list of parts, got {type(content).__name__}")
        media: List[_Media] = []
        texts: List[str] = []
        for i, part in enumerate(content):
            what = f"{where}.content[{i}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, dict):
                raise _Bad(f"{what} must be an object, got {type(part).__name__}")
            kind = part.get("type") or next((k for k in ("image", "image_url", "video", "text") if k in part), None)
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _Bad(f"{what}.text must be a string, got {part.get('text')!r}"[:200])
                texts.append(part["text"])
            elif kind in ("image", "image_url", "video") and not allow_media:
                raise _Bad(f"{what}: the answer must be text, not {kind}")
            elif kind == "image":
                media.append(self.image(part.get("image"), f"{what}.image"))
            elif kind == "image_url":
                url = part.get("image_url")
                media.append(self.image(url.get("url") if isinstance(url, dict) else url, f"{what}.image_url"))
            elif kind == "video":
                media.append(self.video(part.get("video"), f"{what}.video"))
            else:
                raise _Bad(f"{what} has type {kind!r}; expected text, image, image_url or video")
        return media, _PLACEHOLDER.sub("", "\n".join(t.strip("\n") for t in texts if t))

    def conversations_record(self, record: Dict[str, Any], where: str) -> _Record:
        media, question, answer = self.conversation(record)
        if not media:
            raise _Bad("no image or video: give 'image', 'video', or an image/video part in the user turn")
        letters = _OPTION_LINE.findall(question)
        if len(answer) == 1 and answer in letters and "".join(letters) == OPTION_LETTERS[: len(letters)]:
            return _Record(where, tuple(media), question, answer, "multiple_choice", len(letters))
        return _Record(where, tuple(media), question, answer, "open_ended", 0)

    # egoschema

    def egoschema_record(self, record: Dict[str, Any], where: str) -> _Record:
        if "question" not in record:
            raise _Bad("no 'question'")
        stem = self.text(record["question"], "'question'")
        options = self._options(record)
        if "answer" not in record:
            raise _Bad("no 'answer' (the 0-based index of the right option)")
        answer = record["answer"]
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise _Bad(f"'answer' must be the 0-based index of the right option, got {record['answer']!r}")
        if not 0 <= answer < len(options):
            raise _Bad(f"answer index {answer} is out of range for {len(options)} options (0..{len(options) - 1})")
        if "video" in record and "frames" in record:
            raise _Bad("give either 'video' or 'frames', not both")
        if "frames" in record:
            if not isinstance(record["frames"], list):
                raise _Bad(f"'frames' must be a list of image paths, got {type(record['frames']).__name__}")
            media = self.video(record["frames"], "'frames'")
        elif "video" in record:
            media = self.video(record["video"], "'video'")
        else:
            raise _Bad("no 'video' (a video file or a list of frames) and no 'frames'")
        question = "\n".join([stem, *(_option_line(OPTION_LETTERS[i], o) for i, o in enumerate(options))])
        return _Record(where, (media,), question, OPTION_LETTERS[answer], "egoschema", len(options))

    def _options(self, record: Dict[str, Any]) -> List[str]:
        if "options" in record:
            raw = record["options"]
            if not isinstance(raw, list):
                raise _Bad(f"'options' must be a list of strings, got {type(raw).__name__}")
            names = [f"'options'[{i}]" for i in range(len(raw))]
        else:
            numbered = sorted(int(m.group(1)) for m in map(_OPTION_KEY.match, record) if m)
            if numbered != list(range(len(numbered))):
                raise _Bad(f"option keys must run 'option 0', 'option 1', ... without gaps; found {numbered}")
            raw = [record[f"option {i}"] for i in numbered]
            names = [f"'option {i}'" for i in numbered]
        if not MIN_OPTIONS <= len(raw) <= len(OPTION_LETTERS):
            raise _Bad(
                f"{len(raw)} options: give {MIN_OPTIONS} to {len(OPTION_LETTERS)} "
                "('options': [...] or 'option 0', 'option 1', ...)"
            )
        return [" ".join(self.text(value, name).split()) for value, name in zip(raw, names)]


# ----------------------------------------------------------------------------- file reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FirstSightError(f"data file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise FirstSightError(
            f"{path}:{line}: not UTF-8 text ({err}); data files must be UTF-8: convert it "
            f"(e.g. iconv -f latin1 -t utf-8)"
        ) from None
    except OSError as err:
        raise FirstSightError(f"cannot read data file {path}: {err}") from None


def _records(path: Path, text: str) -> Iterator[Tuple[int, Any]]:
    """(line, record or a _Bad) for each record: JSONL lines, or the elements of a JSON list."""
    if path.suffix.lower() not in (".jsonl", ".ndjson") and text.lstrip().startswith("["):
        yield from _json_list(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _Bad(f"not valid JSON ({err.msg} at column {err.colno})")


def _json_list(path: Path, text: str) -> Iterator[Tuple[int, Any]]:
    """The elements of a JSON list with the line each starts on. A syntax error is fatal: the rest
    of the document cannot be read (unlike a bad JSONL line)."""
    decoder = json.JSONDecoder()
    line, seen = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, seen
        line += text.count("\n", seen, pos)
        seen = pos
        return line

    def skip(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    pos = skip(0) + 1  # past "["
    try:
        pos = skip(pos)
        if text[pos : pos + 1] == "]":
            return
        while True:
            value, end = decoder.raw_decode(text, pos)
            yield line_at(pos), value
            pos = skip(end)
            if text[pos : pos + 1] == ",":
                pos = skip(pos + 1)
            elif text[pos : pos + 1] == "]":
                pos = skip(pos + 1)
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos)
        if pos != len(text):
            raise json.JSONDecodeError("Extra data after the list", text, pos)
    except json.JSONDecodeError as err:
        raise FirstSightError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); a JSON list cannot be read "
            "past a syntax error, so fix it (or write one record per line as JSONL, where a bad line can be skipped)"
        ) from None


# ----------------------------------------------------------------------------- dataset


class FileQA:
    """Map-style dataset of QA samples read from one JSONL/JSON file (same interface as SyntheticEgoQA).

    `skipped` counts the records left out under on_bad_sample="skip" and `problems` says why,
    each as "<file>:<line>: <what is wrong>".
    """

    def __init__(
        self,
        path: Union[str, Path],
        format: str,
        split: str = "train",
        image_root: Optional[Union[str, Path]] = None,
        media: MediaSettings = MediaSettings(),
        on_bad_sample: str = "error",
        max_length: Optional[int] = None,
        processor: Any = None,
    ) -> None:
        if format not in FORMATS:
            raise FirstSightError(f"unknown data format {format!r}; valid choices: {', '.join(FORMATS)}")
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise FirstSightError(
                f"unknown on_bad_sample {on_bad_sample!r}; valid choices: {', '.join(BAD_SAMPLE_POLICIES)}"
            )
        self.path = Path(path)
        self.format = format
        self.split = split
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.media = media
        self.on_bad_sample = on_bad_sample
        if max_length is not None and processor is None:
            raise FirstSightError(
                f"data.max_length={max_length} needs the student's processor to count a sample's tokens"
            )
        self.max_length = max_length
        self.processor = processor
        self.problems: List[str] = []
        self._records = self._load()
        self.skipped = len(self.problems)
        if self.skipped:
            log.warning(
                "%s: skipped %d bad record(s), kept %d (data.on_bad_sample=skip)",
                self.path,
                self.skipped,
                len(self._records),
            )

    def _load(self) -> List[_Record]:
        parser = _Parser(self.image_root, self.media)
        parse = parser.egoschema_record if self.format == "egoschema" else parser.conversations_record
        records: List[_Record] = []
        for line, value in _records(self.path, _read_text(self.path)):
            where = f"{self.path}:{line}"
            try:
                if isinstance(value, _Bad):
                    raise value
                if not isinstance(value, dict):
                    raise _Bad(f"expected a JSON object (one record), got {type(value).__name__}")
                record = parse(value, where)
                if self.max_length is not None:
                    self._check_length(record)
                records.append(record)
            except _Bad as bad:
                self._bad(f"{where}: {bad}")
        if not records:
            if not self.problems:
                raise FirstSightError(
                    f"{self.path}: no records (the file is empty): give at least one {self.format} record, one JSON "
                    f"object per line (JSONL) or a JSON list of them; examples: tests/fixtures/{_FIXTURES[self.format]}"
                )
            raise FirstSightError(f"{self.path}: no valid {self.format} samples; {self.skipped_summary()}")
        return records

    def _check_length(self, record: _Record) -> None:
        """A record longer than max_length tokens (prompt with its visual tokens, and answer) is bad."""
        sizes: List[Tuple[int, int]] = []
        for item in record.media:
            if item.kind == "video":  # a file's frame count and size are known once decoded
                try:
                    sizes.extend(frame.size for frame in _load_media(item, self.media))
                except FirstSightError:
                    raise
                except Exception as err:
                    raise _Bad(f"cannot read video {item.paths[0]}: {err}") from None
            else:
                sizes.extend(_fitted_size(size, self.media) for size in item.sizes)
        length, visual = sample_length(self.processor, record.question, record.answer, sizes)
        if length > self.max_length:
            raise _Bad(
                f"the sample is {length} tokens long ({visual} visual tokens for {len(sizes)} frame(s), "
                f"{length - visual} of text), more than data.max_length={self.max_length}: raise data.max_length, "
                f"or give fewer visual tokens (data.max_pixels={self.media.max_pixels} per frame, "
                f"data.max_frames={self.media.max_frames})"
            )

    def _bad(self, problem: str) -> None:
        if self.on_bad_sample == "error":
            raise FirstSightError(
                f"{problem} (data.on_bad_sample=error: fix the record, or set data.on_bad_sample=skip "
                "to leave bad records out and count them)"
            )
        self.problems.append(problem)
        if problem not in _logged:
            _logged.add(problem)
            log.warning("skipping a bad sample: %s", problem)

    def skipped_summary(self) -> str:
        shown = "; ".join(self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"{len(self.problems)} bad record(s) skipped: {shown}{more}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, split={self.split!r}, "
            f"size={len(self)}, skipped={self.skipped})"
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> QASample:
        record = self._records[index]  # IndexError past the end, as a sequence should
        if index < 0:
            index += len(self)
        try:
            images = tuple(image for item in record.media for image in _load_media(item, self.media))
        except FirstSightError:
            raise
        except Exception as err:  # changed on disk since it was checked, or a clip that fails mid-way
            raise FirstSightError(f"{record.where}: cannot read its media: {err}") from None
        return QASample(images, record.question, record.answer, record.kind, record.num_choices, index)

    def image_sizes(self, index: int) -> List[Tuple[int, int]]:
        """(width, height) of each image of sample `index` as the processors get it (fitted to
        data.max_pixels / min_pixels), from the files' headers; a video's frames are not counted."""
        record = self._records[index]
        return [_fitted_size(size, self.media) for item in record.media if item.kind != "video" for size in item.sizes]

    def where(self, index: int) -> str:
        """ "<file>:<line>" of sample `index`."""
        return self._records[index].where

    def chance_accuracy(self) -> float:
        """Mean over the split of 1/num_choices (open-ended questions count 0)."""
        return math.fsum(1 / r.num_choices if r.num_choices else 0.0 for r in self._records) / len(self._records)
