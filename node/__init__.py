"""Voice-network nodes: one agent (keys, registration, heartbeat, drain) and a plug-in per role."""
