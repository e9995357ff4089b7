"""Realtime speech: text streamed in while audio streams out.

:mod:`~cosyserve.realtime.session` is the transport-independent session (incremental
segmentation, one engine request per segment, back-pressure); the WebSocket endpoint
(:mod:`cosyserve.server.routers.realtime`) and the Wyoming server (:mod:`~cosyserve.realtime.wyoming`)
drive it. :mod:`~cosyserve.realtime.textstream` is where a backend that reads text as it arrives
plugs in.
"""
