"""Decentralized LoRA: topologies, mixing weights and modes (pure), and gossip rounds in the simulator."""
