"""Fast-weight learners: meta-learners write a base network's fast weights from its loss gradients on the support
set, per episode (Meta Networks)."""
