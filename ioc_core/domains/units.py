"""Units a device may state for a value (SenML `u` and `bu`, RFC 8428 §4.5), and how each becomes
the unit its metric is stored in.

Unit symbols are those of the SenML registries (RFC 8428 §12.1, and RFC 8798's secondary units such
as `cm`, `hPa`, `kW`, `mm/h`, `km/h` and `/100`), plus a few symbols field devices commonly send for
quantities the registries leave to other units (`bar`, `kPa`, `MPa`, `psi`, `MW`, `kV`, `m3/h`,
`degF`). A metric's own unit text, as the contract writes it, is accepted as itself. Anything else
is not guessed at: the caller rejects the value, since a wrong guess would store 45 cm as 45 m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ioc_core.domains.base import Metric

# Converted values are rounded to this many significant digits: far below any sensor's precision,
# and enough to drop the binary noise of the arithmetic (300 K is 26.85 °C, not 26.850000000000023).
_SIGNIFICANT_DIGITS = 15


@dataclass(frozen=True, slots=True)
class Conversion:
    """`value * scale + offset` gives the value in the metric's unit."""

    scale: float
    offset: float = 0.0

    def apply(self, value: float) -> float:
        if self.scale == 1 and self.offset == 0:
            return value
        converted = value * self.scale + self.offset
        # A finite value may overflow on the way (1e308 km); it then fails the range check.
        return float(f"{converted:.{_SIGNIFICANT_DIGITS}g}")


_SAME = Conversion(1.0)
_PSI_IN_BAR = 6894.757293168 / 100_000  # 1 psi = 6894.757293168 Pa (NIST SP 811)

# By the unit a metric is stored in (`Metric.unit`): the unit symbols accepted for it.
UNITS: dict[str, dict[str, Conversion]] = {
    "m": {"m": _SAME, "cm": Conversion(0.01), "mm": Conversion(0.001), "km": Conversion(1000.0)},
    "mm/h": {"mm/h": _SAME, "m/h": Conversion(1000.0), "m/s": Conversion(3_600_000.0)},
    "bar": {
        "bar": _SAME,
        "Pa": Conversion(1e-5),
        "hPa": Conversion(0.001),
        "kPa": Conversion(0.01),
        "MPa": Conversion(10.0),
        "psi": Conversion(_PSI_IN_BAR),
    },
    "°C": {
        "Cel": _SAME,
        "K": Conversion(1.0, -273.15),
        "degF": Conversion(5 / 9, -32 * 5 / 9),
    },
    "kW": {"kW": _SAME, "W": Conversion(0.001), "MW": Conversion(1000.0)},
    "V": {"V": _SAME, "mV": Conversion(0.001), "kV": Conversion(1000.0)},
    "Hz": {"Hz": _SAME},
    # RFC 8428 writes a ratio as "/" and a percentage as "%"; RFC 8798 adds "/100" and "/1000".
    "fraction": {"/": _SAME, "%": Conversion(0.01), "/100": Conversion(0.01), "/1000": Conversion(0.001)},
    "m³/h": {"m3/h": _SAME, "m3/s": Conversion(3600.0), "l/s": Conversion(3.6)},
    "km/h": {"km/h": _SAME, "m/s": Conversion(3.6)},
    "vehicles/min": {"1/min": _SAME, "1/s": Conversion(60.0)},
    "NTU": {"NTU": _SAME},
    "": {"pH": _SAME},
}

# Units that fit one metric only, not every metric stored in the same unit.
_METRIC_UNITS: dict[str, dict[str, Conversion]] = {
    # "%EL": remaining battery energy level in percent (RFC 8428).
    "batteryLevel": {"%EL": Conversion(0.01)},
}


def conversion(metric: Metric, unit: str) -> Conversion | None:
    """How a value of `metric` given in `unit` becomes one in the metric's own unit; None when
    the unit is unknown or measures something else."""
    if unit == metric.unit:
        return _SAME
    found = UNITS.get(metric.unit, {}).get(unit)
    if found is None:
        found = _METRIC_UNITS.get(metric.name, {}).get(unit)
    return found


def accepted_units(metric: Metric) -> list[str]:
    """The unit symbols `conversion` knows for `metric`, for a rejection's detail."""
    return sorted({*UNITS.get(metric.unit, {}), *_METRIC_UNITS.get(metric.name, {})})
