"""The pipeline's state: `get_state` / `set_state` over the source's position and what the
pipeline owns (batches delivered, operators, the packing window, skips), as a mixin of
`Pipeline` so that its class reads as the path of a record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from resumax.errors import StateMismatchError
from resumax.pipeline.provenance import SKIPS_FIELD, BatchLine, Jump, add_jump, parse_jumps
from resumax.pipeline.state_checks import (
    PIPELINE_STATE_VERSION,
    check_filter_layout,
    check_pipeline_state,
)


class PipelineState:
    """`get_state`, `set_state` and the skips of a `Pipeline` (which sets every attribute used)."""

    @property
    def skips(self) -> list[dict[str, Any]]:
        """The skips (and process-layout changes, with `batches` 0) this run made, as saved in
        the state: `{"batch", "batches", "positions": [first, last], "batch_size",
        "process_count"}`, plus `"rows": [before, after]` with PackSequences."""
        return [jump.to_json() for jump in self._jumps]

    def _batch_line(self) -> BatchLine:
        return BatchLine(
            self.batches_emitted.get_raw_value(),
            self.global_position,
            self._batch_records.global_batch,
            self._jumps,
        )

    # State ------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: the source's position plus what the pipeline owns.

        Prefetched or in-flight batches are not stored: they are recomputed on resume. With
        PackSequences, "packing" holds its settings, the window the source is at and the rows
        already delivered from it.
        """
        state = {
            "version": PIPELINE_STATE_VERSION,
            "source": self.source.get_state(),
            "batches_emitted": self.batches_emitted.get_value(),
            "batch_size": self.batch_size,
            "rng_seed": self.rng_seed,
            "process_count": self.process_count,
        }
        if self._jumps:
            state[SKIPS_FIELD] = self.skips
        if self.operator_states:
            state["operators"] = self.operator_states.to_json()
        if self._packing is not None:
            window_index = self.global_position // self._packing.window
            state["packing"] = self._packing.get_state(window_index, self.packed_rows.get_value())
        return state

    @property
    def global_position(self) -> int:
        """The global record position the next batch starts at: records of every process
        consumed (or skipped) since epoch 0 began (epoch x records per epoch + index)."""
        epoch, index = self.source.position
        return epoch * self.source.records_per_epoch + index

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; raises StateMismatchError naming any differing field.

        A live iterator of this pipeline is ended first: it would go on from the old position.
        """
        self._active.close()
        batches = check_pipeline_state(state, self.rng_seed, packs=self._packing is not None)
        if self._has_filter and self._packing is None:
            check_filter_layout(state, self.process_count, self.batch_size)
        operators = self.operator_states.parse(state.get("operators"))
        jumps = parse_jumps(state.get(SKIPS_FIELD))
        before = self.source.get_state()
        self.source.set_state(state["source"])
        if self._packing is not None:
            try:
                self._set_packing_state(state)
            except StateMismatchError:
                self.source.set_state(before)
                raise
        self.batches_emitted.set_value(batches)
        self.operator_states.restore(operators)
        saved = (
            state.get("batch_size", self.batch_size),
            state.get("process_count", self.process_count),
        )
        if saved != (self.batch_size, self.process_count) and batches:
            # Resumed on another layout: batches before this point were counted in the old one.
            position = self.global_position
            jump = Jump(batches, 0, position, position, *saved)
            if self._packing is not None:
                rows = self.packed_rows.get_value()
                jump = dataclasses.replace(jump, rows=(rows, rows))
            jumps = add_jump(jumps, jump)
        self._jumps = tuple(jumps)

    def _set_packing_state(self, state: dict[str, Any]) -> None:
        """Checks the saved packing against this pipeline and sets the rows delivered."""
        num_epochs = self.source.config.num_epochs
        end = None if num_epochs == -1 else num_epochs * self.source.records_per_epoch
        # A source that restores into another state (a mixture with new weights) would
        # re-pack the current window from other records than the ones already delivered.
        source_changed = self.source.get_state() != state["source"]
        rows = self._packing.check_state(
            state.get("packing"), self.global_position, end, source_changed
        )
        self.packed_rows.set_value(rows)
