"""The commands built on the training library: ``zigma train``, ``zigma sample`` (:mod:`.cli`,
with their option resolution in :mod:`.options`) and ``zigma demo`` (:mod:`.demo`)."""
