"""TensorBoard event files beside `metrics.jsonl`: each metrics line's numbers as scalars and each
event line as text, written synchronously with tensorboardX's record writer (no TensorFlow).

Every file starts with a SessionLog START at the restored step + 1, so TensorBoard drops what a
dead process logged after the checkpoint it resumed from, as `MetricsLog` cuts `metrics.jsonl`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.plugin_text_pb2 import TextPluginData
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

from resumax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
EVENTS_TAG = "events"
_EVENT_FILE_TIME = re.compile(r"events\.out\.tfevents\.(\d{10})\.")
_TEXT_METADATA = SummaryMetadata(
    plugin_data=SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()
    )
)


def scalars_of(line: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics line by key, without `step` (booleans and lists are no scalars)."""
    return {
        key: float(value)
        for key, value in line.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _text_value(tag: str, text: str) -> Summary.Value:
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    return Summary.Value(tag=tag, tensor=tensor, metadata=_TEXT_METADATA)


def _start_after_existing_files(directory: str) -> None:
    """Waits, if needed, until the clock second is past every event file's in `directory`.

    Event files are named by the second they were opened in and TensorBoard reads them in name
    order; a second file opened in the same second would share the name and truncate the first.
    """
    opened = [
        int(match[1])
        for path in glob.glob(os.path.join(directory, "events.out.tfevents.*"))
        if (match := _EVENT_FILE_TIME.match(os.path.basename(path)))
    ]
    while opened and time.time() < max(opened) + 1:
        time.sleep(max(opened) + 1 - time.time())


class TensorBoardLog:
    """Writes metrics lines into a new event file in `<run_dir>/tensorboard/`.

    Each line becomes one event at the line's step: its numbers as scalars tagged with their
    metrics.jsonl keys, and, for a line with an "event" key, the line's JSON as text tagged
    "events". Each line is flushed to the OS once written, as `metrics.jsonl` is.
    """

    def __init__(self, run_dir: str | os.PathLike, restored_step: int):
        self.directory = os.path.join(os.fspath(run_dir), TENSORBOARD_DIR)
        try:
            os.makedirs(self.directory, exist_ok=True)
            _start_after_existing_files(self.directory)
            self._writer = EventsWriter(os.path.join(self.directory, "events"))
        except OSError as error:
            raise ConfigError(
                f"train.tensorboard: cannot write event files in {self.directory!r}: {error}; "
                "make it a writable directory or set train.tensorboard=false"
            ) from error
        purge = Event(
            wall_time=time.time(),
            step=restored_step + 1,
            session_log=SessionLog(status=SessionLog.START),
        )
        self._writer.write_event(purge)
        self._writer.flush()

    def write(self, line: dict[str, Any]) -> None:
        """Appends the event of one metrics line and flushes it."""
        # simple_value, a float32, is the scalar every TensorBoard loader reads (its Rust data
        # server keeps float32 only); metrics.jsonl keeps the float64.
        values = [
            Summary.Value(tag=tag, simple_value=value) for tag, value in scalars_of(line).items()
        ]
        if "event" in line:
            values.append(_text_value(EVENTS_TAG, json.dumps(line)))
        event = Event(wall_time=time.time(), step=line["step"], summary=Summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
