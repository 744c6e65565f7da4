"""The learner: losses (pure torch) and their registry, batching, the lr schedule, the `Learner`
class and its Ray actor shell. Importing this package pulls in neither torch nor Ray; the modules do."""
