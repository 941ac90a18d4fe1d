"""ZeroMQ links, CURVE/ZAP and framing: the only package that imports zmq."""
