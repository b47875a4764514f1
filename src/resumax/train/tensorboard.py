"""TensorBoard event files beside `metrics.jsonl`: each metrics line's numbers as scalars and each
event line as text, in tensorboardX's protocol buffers (no TensorFlow).

Every file starts with a SessionLog START at the restored step + 1, so TensorBoard drops what a
dead process logged after the checkpoint it resumed from, as `MetricsLog` cuts `metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.plugin_text_pb2 import TextPluginData
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboardX.record_writer import masked_crc32c

from resumax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
EVENTS_TAG = "events"
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


def _new_file_name(directory: str) -> str:
    """`events.out.tfevents.<unix seconds>.<files before it>.<host>`: TensorBoard reads a
    directory's event files in name order, so a file opened later sorts later, even within the
    same second (an in-process reopen)."""
    earlier = sum("tfevents" in name for name in os.listdir(directory))
    return f"events.out.tfevents.{int(time.time()):010d}.{earlier:06d}.{socket.gethostname()}"


class TensorBoardLog:
    """Writes metrics lines into a new event file in `<run_dir>/tensorboard/`.

    Each line becomes one event at the line's step: its numbers as scalars tagged with their
    metrics.jsonl keys, and, for a line with an "event" key, the line's JSON as text tagged
    "events". Each event is flushed to the OS as it is written, as `metrics.jsonl`'s lines are,
    so a kill -9 loses none; like them it is not fsynced.
    """

    def __init__(self, run_dir: str | os.PathLike, restored_step: int):
        self.directory = os.path.join(os.fspath(run_dir), TENSORBOARD_DIR)
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.path = os.path.join(self.directory, _new_file_name(self.directory))
            self._file = open(self.path, "xb")  # noqa: SIM115 (closed by close())
        except OSError as error:
            raise ConfigError(
                f"train.tensorboard: cannot write event files in {self.directory!r}: {error}; "
                "make it a writable directory or set train.tensorboard=false"
            ) from error
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        start = SessionLog(status=SessionLog.START)
        self._write(Event(wall_time=time.time(), step=restored_step + 1, session_log=start))

    def _write(self, event: Event) -> None:
        """Appends one TFRecord (length, its masked CRC-32C, the event, its CRC) and flushes."""
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        crcs = struct.pack("<I", masked_crc32c(header)), struct.pack("<I", masked_crc32c(data))
        self._file.write(header + crcs[0] + data + crcs[1])
        self._file.flush()

    def write(self, line: dict[str, Any]) -> None:
        """Appends the event of one metrics line."""
        # simple_value, a float32, is the scalar every TensorBoard loader reads (its Rust data
        # server keeps float32 only); metrics.jsonl keeps the float64.
        values = [
            Summary.Value(tag=tag, simple_value=value) for tag, value in scalars_of(line).items()
        ]
        if "event" in line:
            values.append(_text_value(EVENTS_TAG, json.dumps(line)))
        self._write(Event(wall_time=time.time(), step=line["step"], summary=Summary(value=values)))

    def close(self) -> None:
        self._file.close()
