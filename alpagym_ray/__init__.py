"""alpagym-ray: closed-loop GRPO post-training of driving policies on Ray.

The runtime core (types, schemas, actors, the loop) lives here and depends on no concrete env,
policy, reward or algorithm; the CLI is the one composition root that knows them.
"""

__version__ = "0.1.0"
