"""Ray Serve shells (Scheduler, PrefillEngine, DecodeEngine, TrafficManager) over plain
classes — land with the Serve application issue. Empty until then."""
