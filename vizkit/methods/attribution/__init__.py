"""Attribution methods: which input pixels drive a target (a class, a channel or a neuron)."""
