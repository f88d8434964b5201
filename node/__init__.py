"""Voice-network nodes: one agent (keys, registration, presence, load reports, drain) and a
plug-in per role."""
