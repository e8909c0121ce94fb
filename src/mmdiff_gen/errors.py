"""The one distinction every command draws between failures: the caller's input, or the run.

A `SettingsError` (and a missing input file, FileNotFoundError) is the caller's: a setting no run can use, an
input file of the wrong kind, heads for another backbone, an output folder made from other inputs. The CLI turns
it into exit code 2 in every command; anything else that is expected (weights that cannot load, damaged data,
every sample failing) exits 1. Below everything: any layer may raise it.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting or input that cannot be used: refused before anything is written."""
