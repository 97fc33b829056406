-- Count one event in today's usage history (a refusal, by its problem code).
-- KEYS: 1 history base. ARGV: 1 now override ('' = Redis TIME), 2 field. Returns the day.
local day = windows(now_us(ARGV[1]))
history_add(KEYS[1], day, ARGV[2], 1)
return day
