"""TRL-compatible trainers: MLC (DPO and SFT), MPO and MSD."""
