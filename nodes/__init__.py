"""Node daemons and the hardware/cost model. Daemons know nothing of Mininet."""
