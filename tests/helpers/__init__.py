"""Test utilities shared across test modules: a real uvicorn server on a free loopback port
(:mod:`.live_server`), a tiny Chrome DevTools Protocol client for headless Chromium
(:mod:`.cdp`), and audio decoding plus word error rate for ASR checks (:mod:`.speech`)."""
