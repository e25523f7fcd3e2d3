"""Progress bars for the shell (tqdm on stderr): tiles done / total and MPix/s."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


class TileProgress:
    """Creates one bar per section; used as the library's ProgressFactory."""

    def __init__(self, enabled: bool = True, unit: str = "tile") -> None:
        self.enabled = enabled
        self.unit = unit
        self._bar: tqdm | None = None

    def __call__(self, name: str, pixels: int) -> Callable[[int, int], None]:
        self.close()
        start = time.perf_counter()

        def update(done: int, total: int) -> None:
            if not self.enabled:
                return
            if self._bar is None:
                self._bar = tqdm(
                    total=total, desc=name, unit=self.unit, file=sys.stderr, dynamic_ncols=True, leave=True
                )
            elapsed = max(time.perf_counter() - start, 1e-9)
            if pixels:  # 0: pixels unknown (a bar over sections)
                self._bar.set_postfix_str(f"{pixels * done / total / elapsed / 1e6:.2f} MPix/s", refresh=False)
            self._bar.update(done - self._bar.n)

        return update

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print `text` above the open bar (which stays), or plainly when none is open."""
        if self._bar is not None:
            tqdm.write(text, file=file or sys.stdout)
        else:
            print(text, file=file or sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
