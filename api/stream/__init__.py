"""The live event stream `GET /v1/stream`: Server-Sent Events fed from `ioc.events`.

One `EventHub` per API process follows every partition of `ioc.events` with a consumer of its own
(no group: each process sees every event) and fans each event out to the open streams, each with
a bounded queue. An event's SSE `id` encodes the hub's whole position after it: the next offset of
every partition. A client that comes back with `Last-Event-ID` is subscribed to the fan-out first,
noting the hub's position H at that instant; a temporary consumer then reads from the client's
position up to H, and the live queue goes on from H. So nothing still retained in Kafka is missed
and nothing is sent twice, whichever partitions the events were on.
"""
