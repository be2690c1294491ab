"""The virtual-time backend (SimPy): the scenario's serving system as a discrete-event
simulation that calls the daemons' own decision code, with a flow-level network
(``sim.network``), the entities (``sim.nodes``) and the runner (``sim.run``)."""
