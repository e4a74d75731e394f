"""Discrete-event simulation of routing policies over replicas in several regions."""

from isthmus.sim.events import EventLoop
from isthmus.sim.metrics import SimResult, percentiles
from isthmus.sim.simulator import Simulation

__all__ = ["EventLoop", "SimResult", "Simulation", "percentiles"]
