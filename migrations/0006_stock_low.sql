-- A sale's own stock.low threshold (engine/events.py); NULL: FLASHSALE_STOCK_LOW_UNITS.
ALTER TABLE sales ADD COLUMN stock_low_units integer CHECK (stock_low_units >= 0);
