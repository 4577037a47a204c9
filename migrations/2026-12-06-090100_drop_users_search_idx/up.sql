-- The three-column trigram index, which users_search_text_idx replaces:
-- dropped so that writes stop maintaining two. CONCURRENTLY, alone in a
-- migration outside a transaction, for the reasons of the previous ones.
-- During a rolling deploy, replicas of the previous version still search
-- with the three-column conditions; from here until they are replaced, their
-- searches read the table instead of an index.
DROP INDEX CONCURRENTLY IF EXISTS users_search_idx;
