"""ksbopt's own optax transforms: charge control, symmetrize, noether_rmsprop, teleport."""
