"""The station talks to the line: sinks fed by the gateway's delivered record stream.

``edge-alerts`` (edge_runtime/cli/alerts.py) delivers every decision once,
de-duplicated and gap-recovered; each sink gets that stream:

* ``opcua``   — an OPC UA server for a PLC (last result, counters, heartbeat, acknowledge)
               and ``OpcUaWriter`` for writing into an existing server (asyncua);
* ``mqtt``    — MQTT (JSON topic tree, or Sparkplug B via ``sparkplug``) with an on-disk
               spool that survives broker outages (paho-mqtt);
* ``overlay`` — heat-map overlay PNGs (pure function) and a bounded-disk writer;
* ``plots``   — evaluation plots (ROC, PRO, histograms, worst cases; matplotlib);
* ``view``    — a live HTTP/SSE view, an independent subscriber of the alert channel.

docs/line.md describes the wiring, the node layout and the topic tree.
"""
