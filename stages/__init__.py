"""The pipeline's stages (extract, align, distill, evaluate), their models and losses."""
