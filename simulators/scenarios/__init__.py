"""What happens in a simulated city, and the ground truth of it.

A scenario decides, for every reading a device is due to send, what goes on the wire, and which
devices lose or regain power; it notes each incident it causes (`simulators.truth.Incident`). Its
timeline is laid over the run: `progress` goes from 0 at the start to 1 at the end, so the same
storm takes a minute in a test and three hours in a drill. Readings always carry the real time.

- `normal`: every device behaves as its domain's sampler says; no incident.
- `storm`: rain builds over the city, heaviest over some wards, where flood stations rise
  past their alert and then danger levels (and the ward's district flood alarm follows), the feeders
  running the drainage pumps sag, and traffic comes to a standstill on flooded roads; then the
  water recedes.
- `outage`: one distribution feeder fails and every device on it (its meters, the water works it
  powers) goes silent at once, its connection dropped so the broker publishes its last will; the
  feeder comes back later and the devices reconnect.
- `bad-devices`: a few devices misbehave once each (malformed and oversized payloads, values out of
  range or not finite, unknown metrics, bad and future timestamps, a device on another domain's
  topic, an unregistered device, a bad status), one sends a message twice, one sends a stale
  reading after newer ones, and one device's clock runs twelve minutes ahead all along.
"""

from simulators.scenarios.bad_devices import BadDevices
from simulators.scenarios.base import MIN_READINGS, PIPELINE_ALLOWANCE_S, Scenario, Send, ramp
from simulators.scenarios.outage import Outage
from simulators.scenarios.storm import Storm

SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (Scenario, Storm, Outage, BadDevices)}

__all__ = [
    "MIN_READINGS",
    "PIPELINE_ALLOWANCE_S",
    "SCENARIOS",
    "BadDevices",
    "Outage",
    "Scenario",
    "Send",
    "Storm",
    "ramp",
]
