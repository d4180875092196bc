"""`cat` for a shard that arrives slowly, as from a congested network store: `chunk` bytes at a
time, each after `pause` seconds. Used as a WebDataset `pipe:` URL by the step-time test."""
import sys
import time

path, chunk, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with open(path, "rb") as shard:
    while data := shard.read(chunk):
        time.sleep(pause)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
