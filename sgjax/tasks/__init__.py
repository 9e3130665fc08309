"""Generated tasks for the recurrent experiments: Copy and Repeat Copy (``copy``), character
language modelling on a text (``char_lm``)."""
