"""HTTP services of onpolicy: the teacher scoring service and the control plane."""
