"""Files in and out: the one atomic writer (`atomic`) and video / image reading and writing (`video`)."""
