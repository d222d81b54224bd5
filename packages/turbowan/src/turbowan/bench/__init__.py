"""turbowan-bench: memory/speed sweeps of offloadkit strategies on the Wan DiT, a planner
for cards you do not have, and peers (diffusers, accelerate) measured in the same run."""
